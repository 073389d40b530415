"""The web UI (`infinite-talk ui`): a Gradio Blocks app over the same options schema and pipeline as the CLI.

`controls` maps schema fields to control specs and formats every text the page shows (pure, no gradio);
`session` holds the one pipeline, the GPU queue and the running jobs; `app` builds the page and the `ui` command.
"""
