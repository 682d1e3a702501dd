"""V3 node adapters of the pack (one module per technique) and the extension that lists them."""
from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from . import adaptive_guidance, asg, diffusehigh, digits, inversion, linear_ag, negtome, stylessp, tale


class TFGExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*adaptive_guidance.NODES, *linear_ag.NODES, *negtome.NODES, *diffusehigh.NODES, *asg.NODES,
                *inversion.NODES, *stylessp.NODES, *tale.NODES, *digits.NODES]
