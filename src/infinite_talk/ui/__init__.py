"""The web UI (`infinite-talk ui`): a Gradio Blocks app over the same options schema and pipeline as the CLI.

`controls` maps schema fields to control specs and formats every text the page shows (pure, no gradio);
`session` holds the one pipeline and runs generations through the job service's store and worker; `jobs` and `live`
turn the server's state into what a page shows (job, history, live video); `app` builds the page and the `ui` command.
"""
