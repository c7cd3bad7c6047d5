"""`imgsim serve`: an HTTP API and a web page over one index (the optional extra `imgsim[serve]`).

The core never imports this package; `imgsim.cli` imports it only when `serve` runs.
"""

from .app import ServeSettings, create_app, run

__all__ = ["ServeSettings", "create_app", "run"]
