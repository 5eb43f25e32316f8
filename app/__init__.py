"""attnctrl's Gradio web app (``attnctrl app``, needs ``pip install 'attnctrl[app]'``).

    from attnctrl.app import launch
    launch()                      # http://127.0.0.1:7860, the embedded default model

Panels are generated from the registered controls' parameter schemas (`attnctrl.app.schema`);
the per-request work (model cache, fresh controls, runs, reproduction commands) is in
`attnctrl.app.runner`, which does not need Gradio. See docs/app.md.
"""

from __future__ import annotations

__all__ = ["build_app", "launch"]


def build_app(*args, **kwargs):
    """The app's `gradio.Blocks`, not launched (see `attnctrl.app.ui.build_app`)."""
    from .ui import build_app as _build

    return _build(*args, **kwargs)


def launch(*args, **kwargs):
    """Build, queue and launch the app (see `attnctrl.app.ui.launch`)."""
    from .ui import launch as _launch

    return _launch(*args, **kwargs)
