"""Run by tests/test_ui_browser.py; not a test module itself.

    ui_host_app.py PORT OUTPUT_DIR

A host Gradio app of two tabs, as a user of a larger app would write it: an "Other" tab of its own (an echo box)
and the Infinite Talk interface from `build_tab` on the tiny preset. The host sets its own queue and launch
options; the tab adds none.
"""

from __future__ import annotations

import sys

import gradio as gr

from infinite_talk.ui import Studio, build_tab, host_launch_options


def main() -> None:
    port, output_dir = int(sys.argv[1]), sys.argv[2]
    studio = Studio(preset="tiny", output_dir=output_dir)
    with gr.Blocks(title="Host app") as host:
        with gr.Tab("Other"):
            text = gr.Textbox(label="Say", elem_id="host-say")
            echo = gr.Textbox(label="Echo", elem_id="host-echo")
            text.submit(lambda s: s.upper(), text, echo)
        with gr.Tab("Infinite Talk"):
            build_tab(studio)
    host.queue(max_size=8)
    host.launch(server_name="127.0.0.1", server_port=port, ssr_mode=False, **host_launch_options(studio))


if __name__ == "__main__":
    main()
