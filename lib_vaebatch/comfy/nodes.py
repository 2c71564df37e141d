"""The ComfyUI nodes (V3 schema, ``comfy_api.latest``): built when ComfyUI asks for them, since
their base classes come from the running ComfyUI.

Node ids and required input names are a contract (API workflows name them):

* ``VAEBatchDecode``: ``samples`` (LATENT), ``vae`` (VAE), options -> IMAGE, report (STRING);
* ``VAEBatchEncode``: ``pixels`` (IMAGE), ``vae`` (VAE), options -> LATENT, report;
* ``VAEBatchEncodeImages``: ``vae`` and ``image_1`` ... ``image_64`` (IMAGE; the first required) ->
  a list of LATENTs in input order (one per run of same-size images), report;
* ``VAEBatchRemoteVAE``: ``endpoint`` (STRING), ``family`` -> VAE (a Hybrid Inference endpoint).

The image inputs are fixed names on every ComfyUI: ``io.Autogrow`` (newer ComfyUI) names its slots
``<input>.<slot>`` in API workflows (``images.image_1``), which would change the contract between
ComfyUI versions. The pack's front-end script (``web/``) shows them growing as they are connected.
The options are optional widgets at the command line's defaults; their values are checked before
the graph runs (ComfyUI answers HTTP 400 with the reason).
"""

from __future__ import annotations

from typing import Any

from lib_vaebatch.comfy import glue, remote
from lib_vaebatch.comfy.options import DECODE_OPTIONS, ENCODE_OPTIONS, Option, validate

CATEGORY = "latent/vae batch"
#: The most image inputs VAEBatchEncodeImages has.
MAX_IMAGES = 64
IMAGE_INPUTS = tuple(f"image_{i}" for i in range(1, MAX_IMAGES + 1))
#: Each option's default (the command line's).
D: dict[str, Any] = {o.name: o.default for o in DECODE_OPTIONS}


def _option_input(io: Any, o: Option) -> Any:
    if o.kind == "bool":
        return io.Boolean.Input(o.name, default=o.default, optional=True, tooltip=o.tooltip)
    if o.kind == "int":
        return io.Int.Input(o.name, default=o.default, min=o.minimum, max=o.maximum, optional=True,
                            tooltip=o.tooltip)  # fmt: skip
    choices = list(o.choices)
    return io.Combo.Input(o.name, options=choices, default=o.default, optional=True, tooltip=o.tooltip)


def _options(values: dict[str, Any], allowed: tuple[Option, ...]) -> dict[str, Any]:
    names = {o.name for o in allowed}
    return {k: v for k, v in values.items() if k in names}


def node_classes() -> list[type]:
    """The node classes, on the running ComfyUI's V3 API."""
    from comfy_api.latest import io, ui

    def report_output(text: str, *values: Any) -> Any:
        return io.NodeOutput(*values, text, ui=ui.PreviewText(text))

    class VAEBatchDecode(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> Any:
            return io.Schema(
                node_id="VAEBatchDecode",
                display_name="VAE Batch Decode",
                category=CATEGORY,
                description=(
                    "Decodes latents that never lose a batch: chunks sized from free memory, NaN/Inf "
                    "checked per image with only the failed ones decoded again in a more robust "
                    "precision, and out-of-memory met by smaller chunks and exact tiles, keeping the "
                    "images already done. Same pixels as VAE Decode when nothing goes wrong."
                ),
                inputs=[
                    io.Latent.Input("samples"),
                    io.Vae.Input("vae"),
                    *(_option_input(io, o) for o in DECODE_OPTIONS),
                ],
                outputs=[io.Image.Output(display_name="IMAGE"), io.String.Output(display_name="report")],
                hidden=[io.Hidden.unique_id],
            )

        @classmethod
        def validate_inputs(
            cls, nan_check: Any = D["nan_check"], ladder: Any = D["ladder"], tiling: Any = D["tiling"],
            tile_mode: Any = D["tile_mode"], tile_size: Any = D["tile_size"], max_chunk: Any = D["max_chunk"],
        ) -> Any:  # fmt: skip
            # named, not **kwargs: ComfyUI then checks only these itself, and names only these
            values = {"nan_check": nan_check, "ladder": ladder, "tiling": tiling}
            return validate(values | {"tile_mode": tile_mode, "tile_size": tile_size, "max_chunk": max_chunk})

        @classmethod
        def execute(cls, samples: Any, vae: Any, **options: Any) -> Any:
            out = glue.decode(vae, samples, _options(options, DECODE_OPTIONS), cls.hidden.unique_id)
            return report_output(out.report, out.images)

    class VAEBatchEncode(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> Any:
            return io.Schema(
                node_id="VAEBatchEncode",
                display_name="VAE Batch Encode",
                category=CATEGORY,
                description=(
                    "Encodes images to latents (the posterior mean: the same latents every time), "
                    "cropped to the VAE's multiple as VAE Encode crops, alpha dropped; chunks sized "
                    "from free memory and exact tiles where an image does not fit."
                ),
                inputs=[
                    io.Image.Input("pixels"),
                    io.Vae.Input("vae"),
                    *(_option_input(io, o) for o in ENCODE_OPTIONS),
                ],
                outputs=[io.Latent.Output(display_name="LATENT"), io.String.Output(display_name="report")],
                hidden=[io.Hidden.unique_id],
            )

        @classmethod
        def validate_inputs(
            cls, tiling: Any = D["tiling"], tile_mode: Any = D["tile_mode"], tile_size: Any = D["tile_size"],
            max_chunk: Any = D["max_chunk"],
        ) -> Any:  # fmt: skip
            return validate({"tiling": tiling, "tile_mode": tile_mode, "tile_size": tile_size,
                             "max_chunk": max_chunk})  # fmt: skip

        @classmethod
        def execute(cls, pixels: Any, vae: Any, **options: Any) -> Any:
            out = glue.encode(vae, pixels, _options(options, ENCODE_OPTIONS), cls.hidden.unique_id)
            return report_output(out.report, {"samples": out.latents})

    class VAEBatchEncodeImages(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> Any:
            images = [io.Image.Input(name, optional=name != "image_1") for name in IMAGE_INPUTS]
            return io.Schema(
                node_id="VAEBatchEncodeImages",
                display_name="VAE Batch Encode Images",
                category=CATEGORY,
                description=(
                    "Encodes any number of images (image_1, image_2, ...: a new input appears as one "
                    "is connected), each at its own size: images of one size are encoded together, "
                    "and the latents come out in input order, one LATENT per run of same-size images "
                    "(one LATENT when all share a size). VAE Batch Decode of them gives one image per "
                    "input, at its size."
                ),
                inputs=[io.Vae.Input("vae"), *images, *(_option_input(io, o) for o in ENCODE_OPTIONS)],
                outputs=[
                    io.Latent.Output(display_name="LATENT", is_output_list=True),
                    io.String.Output(display_name="report"),
                ],
                hidden=[io.Hidden.unique_id],
            )

        @classmethod
        def validate_inputs(
            cls, tiling: Any = D["tiling"], tile_mode: Any = D["tile_mode"], tile_size: Any = D["tile_size"],
            max_chunk: Any = D["max_chunk"],
        ) -> Any:  # fmt: skip
            return validate({"tiling": tiling, "tile_mode": tile_mode, "tile_size": tile_size,
                             "max_chunk": max_chunk})  # fmt: skip

        @classmethod
        def execute(cls, vae: Any, **inputs: Any) -> Any:
            given = [inputs[name] for name in IMAGE_INPUTS if inputs.get(name) is not None]
            latents, report = glue.encode_images(
                vae, given, _options(inputs, ENCODE_OPTIONS), cls.hidden.unique_id
            )
            return report_output(report, latents)

    class VAEBatchRemoteVAE(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> Any:
            return io.Schema(
                node_id="VAEBatchRemoteVAE",
                display_name="VAE Batch Remote VAE",
                category=CATEGORY,
                description=(
                    "A VAE on another machine, spoken to with diffusers' Hybrid Inference protocol: "
                    "another VAE Batch server's /vaebatch/v1/remote/decode (its encode is found "
                    "beside it), or any server speaking that protocol. The VAE Batch nodes run it "
                    "with their checks and retries; VAE Decode and VAE Encode work with it too."
                ),
                inputs=[
                    io.String.Input(
                        "endpoint",
                        default="http://127.0.0.1:7860/vaebatch/v1/remote/decode",
                        tooltip="The decode URL (http or https).",
                    ),
                    io.Combo.Input(
                        "family",
                        options=list(remote.FAMILY_CHOICES),
                        default="auto",
                        tooltip="The model family of its latents (auto: the server says).",
                    ),
                ],
                outputs=[io.Vae.Output(display_name="VAE")],
            )

        @classmethod
        def validate_inputs(cls, endpoint: Any = "", family: Any = "auto") -> Any:
            if family not in remote.FAMILY_CHOICES:
                return f"family: expected one of {', '.join(remote.FAMILY_CHOICES)}, not {family!r}"
            return remote.check_endpoint(endpoint)

        @classmethod
        def execute(cls, endpoint: str, family: str = "auto") -> Any:
            return io.NodeOutput(remote.RemoteComfyVAE(endpoint.strip(), family))

    return [VAEBatchDecode, VAEBatchEncode, VAEBatchEncodeImages, VAEBatchRemoteVAE]


def extension() -> Any:
    """The ``ComfyExtension`` ComfyUI's loader asks the pack's ``comfy_entrypoint`` for."""
    from comfy_api.latest import ComfyExtension

    classes = node_classes()

    class VAEBatchExtension(ComfyExtension):
        async def get_node_list(self) -> list[type]:
            return classes

    return VAEBatchExtension()
