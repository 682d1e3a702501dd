"""Training-free guidance and editing nodes for ComfyUI (V3 schema).

Import is kept light: the node modules load when ComfyUI asks for the extension."""


async def comfy_entrypoint():
    from .nodes import TFGExtension

    return TFGExtension()
