"""The Gradio app: a form generated from the registered controls' schemas, run through the queue.

Nothing here knows any control: every panel comes from `attnctrl.app.schema.panels()`, built
from `CONTROLS` when the app is built, so a control registered before launch gets its panel.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, TypedDict

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
from gradio.blocks import Block

from attnctrl.app.runner import (
    Limits,
    ModelCache,
    OutOfMemory,
    Request,
    layer_rows,
    model_key,
    run_request,
    word_choices,
)
from attnctrl.app.schema import Field, Panel, panels

__all__ = ["build_app", "launch"]

log = logging.getLogger(__name__)

EXAMPLE_PROMPT = "a red car and a white sheep"
#: errors shown to the user as a message (anything else is logged with its traceback, and shown too)
_USER_ERRORS = (ValueError, TypeError, NotImplementedError, KeyError, OSError, OutOfMemory)
_CSS = """
#status .prose p, #model-status .prose p { margin: 0.2em 0; }
.attnctrl-error { color: #b91c1c; font-weight: 600; }
"""


def _theme():
    # local font stacks only: the page must not fetch fonts from the internet
    return gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def _error_text(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    return text


def _error(err: BaseException) -> str:
    if not isinstance(err, _USER_ERRORS):
        log.exception("attnctrl app: unexpected error")
        return f'<span class="attnctrl-error">Error (internal): {type(err).__name__}: {_error_text(err)}</span>'
    return f'<span class="attnctrl-error">Error: {_error_text(err)}</span>'


def _many(updates: list):
    """Gradio takes a list returned for one output as that output's value: unwrap a single update."""
    return updates[0] if len(updates) == 1 else updates


class _CommonArgs(TypedDict):
    """The keyword arguments every field's component takes."""

    label: str
    info: str | None
    elem_id: str
    interactive: bool


def _widget(f: Field):
    """The Gradio component of one control parameter."""
    common: _CommonArgs = {"label": f.label, "info": f.help or None, "elem_id": f.elem_id, "interactive": True}
    init = f.initial()
    if f.kind == "bool":
        return gr.Checkbox(value=init, **common)
    if f.kind == "choice":
        return gr.Dropdown(choices=[(str(c), c) for c in f.choices or ()], value=init, **common)
    if f.kind in ("int", "float"):
        rng = f.range
        step = 1 if f.kind == "int" else 0.01
        if rng is not None and init is not None:
            return gr.Slider(minimum=rng[0], maximum=rng[1], step=step, value=init, **common)
        return gr.Number(value=init, precision=0 if f.kind == "int" else None, **common)
    placeholder = "layer selector, e.g. cross,res=16" if f.selector else ("words of the prompt" if f.words else None)
    return gr.Textbox(value=init, lines=1, placeholder=placeholder, **common)


def build_app(
    model: str | None = None, *, cache: ModelCache | None = None, cache_size: int = 2, limits: Limits | None = None
) -> gr.Blocks:
    """The app's Blocks (not launched). `model` prefills the model box (default: the embedded default);
    `limits` caps what one request may ask for (default `Limits()`: 100 steps, 1024x1024 px, 4 images)."""
    cache = cache if cache is not None else ModelCache(cache_size)
    limits = limits if limits is not None else Limits()
    default_model = model_key(model)
    forms = panels()

    with gr.Blocks(title="attnctrl", analytics_enabled=False) as demo:
        demo.attnctrl_cache = cache  # for callers and tests
        demo.attnctrl_limits = limits
        gr.Markdown(
            "# attnctrl\nTraining-free attention control for diffusion models. Pick the words a control acts on, "
            "switch controls on, generate: you get the image with and without the controls at the same seed, "
            "the per-word attention maps, and the command that reproduces the run."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=420):
                with gr.Row():
                    model_box = gr.Textbox(
                        value=default_model,
                        label="model",
                        scale=4,
                        elem_id="model",
                        info="embedded name (tiny-sd, tiny-sdxl, ...), hub id org/name or local diffusers folder; "
                        "loaded once and cached",
                    )
                    load_btn = gr.Button("Load model", scale=1, elem_id="load-model")
                model_status = gr.Markdown("", elem_id="model-status")
                prompt = gr.Textbox(value=EXAMPLE_PROMPT, label="prompt", lines=2, elem_id="prompt")
                chips = gr.CheckboxGroup(
                    choices=word_choices(EXAMPLE_PROMPT),
                    value=[],
                    elem_id="words",
                    label="words of the prompt",
                    info="select the words controls act on: they fill the word fields (tokens, phrases, groups) "
                    "of the controls that are on",
                )
                negative = gr.Textbox(value="", label="negative prompt", lines=1, elem_id="negative")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed", minimum=0)
                    steps = gr.Number(
                        value=20, precision=0, label="steps", elem_id="steps", info=f"at most {limits.max_steps}"
                    )
                    guidance = gr.Number(value=7.5, label="guidance scale", elem_id="guidance")
                with gr.Row():
                    height = gr.Number(value=0, precision=0, label="height (px, 0 = default)", elem_id="height")
                    width = gr.Number(value=0, precision=0, label="width (px, 0 = default)", elem_id="width")
                    num_images = gr.Number(
                        value=1,
                        precision=0,
                        label="images",
                        elem_id="num-images",
                        info=f"at most {limits.max_images}; at most {limits.max_pixels} px each",
                    )
                compare = gr.Checkbox(
                    value=True, label="also run without controls (same seed), side by side", elem_id="compare"
                )

                gr.Markdown(
                    "### Controls\nEach panel is built from the control's constructor; help texts cite the "
                    "paper. Switch on any number; they run in the order listed."
                )
                widgets: list[tuple[Panel, Any, list]] = []
                for panel in forms:
                    with gr.Accordion(
                        panel.title, open=False, elem_id=f"control-{panel.name}", elem_classes=["control-panel"]
                    ):
                        if panel.summary:
                            gr.Markdown(panel.summary)
                        enable = gr.Checkbox(value=False, label=f"use {panel.name}", elem_id=f"enable-{panel.name}")
                        fields = [_widget(f) for f in panel.fields]
                    widgets.append((panel, enable, fields))

                with gr.Accordion("Layer picker: which layers a selector matches", open=False, elem_id="layer-picker"):
                    selector = gr.Textbox(
                        value="cross",
                        label="layer selector",
                        elem_id="selector",
                        info="terms joined by ',' must all hold (self, cross, down/mid/up, res=16, block=1, "
                        "name=..., re=..., heads=0|3); several selectors separated by ';'",
                    )
                    show_layers = gr.Button("Show matching layers", elem_id="show-layers")
                    layers_status = gr.Markdown("", elem_id="layers-status")
                    layers_table = gr.Dataframe(
                        headers=["name", "kind", "place", "block", "resolution", "heads"],
                        value=None,
                        interactive=False,
                        elem_id="layers-table",
                    )

            with gr.Column(scale=6, min_width=420):
                run_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                runs = gr.State(0)  # this session's run counter, shown in the status line
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    baseline_gallery = gr.Gallery(
                        label="without controls",
                        elem_id="baseline",
                        columns=2,
                        height=300,
                        object_fit="contain",
                        format="png",
                    )
                    result_gallery = gr.Gallery(
                        label="with controls",
                        elem_id="result",
                        columns=2,
                        height=300,
                        object_fit="contain",
                        format="png",
                    )
                heat_gallery = gr.Gallery(
                    label="attention maps per word (with controls)",
                    elem_id="heatmaps",
                    columns=4,
                    height=420,
                    object_fit="contain",
                    format="png",
                )
                run_info = gr.Textbox(
                    label="run info (hash of the final latents: same seed + controls = same hash)",
                    elem_id="run-info",
                    lines=2,
                    interactive=False,
                )
                cli_box = gr.Code(
                    label="copy as CLI command",
                    language="shell",
                    elem_id="cli-command",
                    interactive=False,
                    buttons=["copy"],
                    wrap_lines=True,
                    lines=2,
                    max_lines=6,
                )
                py_box = gr.Code(
                    label="copy as Python",
                    language="python",
                    elem_id="python-code",
                    interactive=False,
                    buttons=["copy"],
                    lines=8,
                    max_lines=24,
                )

        # ---- words of the prompt ------------------------------------------------------------------
        def on_prompt(text, selected):
            words = word_choices(text)
            return gr.update(choices=words, value=[w for w in (selected or []) if w in words])

        prompt.change(on_prompt, [prompt, chips], chips, queue=False)

        word_targets = [
            (panel, enable, w, f) for panel, enable, fields in widgets for f, w in zip(panel.fields, fields) if f.words
        ]

        if word_targets:

            def on_chips(selected, *enabled):
                return _many(
                    [
                        gr.update(value=f.fill(selected)) if on else gr.update()
                        for (_, _, _, f), on in zip(word_targets, enabled)
                    ]
                )

            chips.change(on_chips, [chips, *[t[1] for t in word_targets]], [t[2] for t in word_targets], queue=False)

            for panel, enable, fields in widgets:
                own = [(w, f) for f, w in zip(panel.fields, fields) if f.words]
                if not own:
                    continue

                def on_enable(on, selected, *current, _own=own):
                    return _many(
                        [
                            gr.update(value=f.fill(selected))
                            if on and not (cur or "").strip() and selected
                            else gr.update()
                            for (w, f), cur in zip(_own, current)
                        ]
                    )

                enable.change(on_enable, [enable, chips, *[w for w, _ in own]], [w for w, _ in own], queue=False)

        # ---- model and layers ---------------------------------------------------------------------
        def on_load(name):
            try:
                with cache.use(name) as pipe:
                    n = len(pipe.layers())
                    grid = pipe.default_grid()
                return f"Loaded **{model_key(name)}** ({pipe.family}, {n} attention layers, token grid {grid[0]}x{grid[1]})."
            except Exception as err:
                return _error(err)

        load_btn.click(on_load, model_box, model_status)

        def on_layers(name, sel, h, w):
            try:
                with cache.use(name) as pipe:
                    rows = layer_rows(pipe, sel, int(h) if h else None, int(w) if w else None)
                return f"{len(rows)} layer(s) match {sel.strip()!r}" if (
                    sel or ""
                ).strip() else f"{len(rows)} layers", rows
            except Exception as err:
                return _error(err), None

        show_layers.click(on_layers, [model_box, selector, height, width], [layers_status, layers_table])

        # ---- generate -----------------------------------------------------------------------------
        inputs: set[Block] = {
            model_box,
            prompt,
            negative,
            seed,
            steps,
            guidance,
            height,
            width,
            num_images,
            compare,
            runs,
        }
        for _, enable, fields in widgets:
            inputs.add(enable)
            inputs.update(fields)
        outputs = [status, runs, baseline_gallery, result_gallery, heat_gallery, run_info, cli_box, py_box]

        def on_generate(data: dict, progress=gr.Progress()):  # noqa: B008 - how Gradio injects progress
            n = (data[runs] or 0) + 1
            try:
                chosen = []
                for panel, enable, fields in widgets:
                    if data[enable]:
                        chosen.append((panel.name, panel.items([data[w] for w in fields])))
                req = Request(
                    prompt=data[prompt] or "",
                    model=data[model_box],
                    negative=(data[negative] or "").strip() or None,
                    seed=data[seed],
                    steps=data[steps],
                    guidance=data[guidance],
                    height=data[height] or None,
                    width=data[width] or None,
                    num_images=data[num_images],
                    controls=chosen,
                    compare=bool(data[compare]),
                )
                progress((0, 1), desc="loading model")
                res = run_request(
                    req, cache, progress=lambda done, total, desc: progress((done, total), desc=desc), limits=limits
                )
            except Exception as err:
                return f"Run {n} · {_error(err)}", n, None, None, None, "", "", ""
            names = ", ".join(n for n, _ in chosen) or "none (maps only)"
            text = (
                f"Run {n} · Done in {res.seconds:.1f} s · model **{res.model}** · seed {int(req.seed)} · "
                f"{res.size[0]}x{res.size[1]} · controls: {names}"
            )
            if res.note:
                text += f" · {res.note}"
            return (text, n, res.baseline, res.images, res.heatmaps, json.dumps(res.info()), res.cli, res.python)

        # the progress bar (one tick per denoising step) shows over the two pictures only
        run_btn.click(
            on_generate, inputs, outputs, concurrency_id="generate", show_progress_on=[baseline_gallery, result_gallery]
        )
    return demo


def launch(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    *,
    concurrency: int = 2,
    cache_size: int = 2,
    limits: Limits | None = None,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
):
    """Build, queue and launch the app; returns the launched Blocks."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    demo = build_app(model, cache_size=cache_size, limits=limits)
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=prevent_thread_lock,
        show_error=True,
        ssr_mode=False,
        quiet=quiet,
        theme=_theme(),
        css=_CSS,
    )
    return demo
