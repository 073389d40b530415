"""The web UI (`infinite-talk ui`): a Gradio Blocks app over the same options schema and pipeline as the CLI.

`controls` maps schema fields to control specs and formats every text the page shows (pure, no gradio);
`session` holds the one pipeline and runs generations through the job service's store and worker; `jobs` and `live`
turn the server's state into what a page shows (job, history, live video); `app` builds the page and the `ui` command.
`build_tab(studio)` renders the interface into a host app's current Gradio context (a tab of a larger app);
`build_app(studio)` is that tab in its own Blocks.
"""

from .app import build_app, build_tab, host_launch_options
from .session import Studio

__all__ = ["Studio", "build_app", "build_tab", "host_launch_options"]
