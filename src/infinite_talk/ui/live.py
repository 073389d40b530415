"""The live player: a `<video>` that plays a job's finished chunks while it renders.

Chromium plays HLS natively only in some builds (Debian's does not), and hls.js would have to be fetched from the
network, so the page feeds the job's live segments (self-contained fragmented mp4s, `service/live.py`) to Media
Source Extensions with the small script below, in "sequence" mode (each segment's timestamps start at 0). The
component's value is `ui/jobs.py` `JobPanel.live` (JSON: job id, segment URLs, ended, audio); the script appends
segments as the list grows and starts playing after the first. The `<video>` sits next to the component, not in its
template, so redrawing the value does not reset the player.
"""

from __future__ import annotations

PLAYER_JS = r"""
const box = document.createElement('div');
box.className = 'it-live-box';
box.style.display = 'none';
const video = document.createElement('video');
video.id = 'live-video';
video.controls = true;
video.muted = true;
video.autoplay = true;
video.playsInline = true;
video.style.width = '100%';
video.style.maxHeight = '360px';
const label = document.createElement('div');
label.textContent = 'Live: the finished chunks, while the rest renders';
label.style.fontSize = '0.85em';
box.appendChild(label);
box.appendChild(video);
element.after(box);
let run = null;
function data() {
  try { return JSON.parse(props.value || '{}'); } catch (e) { return {}; }
}
function start(d) {
  const ms = new MediaSource();
  const mine = {job: d.job, ms: ms, sb: null, next: 0, busy: false};
  run = mine;
  video.dataset.segments = '0';
  video.src = URL.createObjectURL(ms);
  ms.addEventListener('sourceopen', () => {
    if (run !== mine) return;
    const codecs = d.audio ? 'avc1.64001f, mp4a.40.2' : 'avc1.64001f';
    mine.sb = ms.addSourceBuffer('video/mp4; codecs="' + codecs + '"');
    mine.sb.mode = 'sequence';
    pump();
  }, {once: true});
}
async function pump() {
  const r = run;
  if (!r || !r.sb || r.busy) return;
  const d = data();
  if (d.job !== r.job) return;
  const urls = d.segments || [];
  if (r.next < urls.length) {
    r.busy = true;
    try {
      const response = await fetch(urls[r.next]);
      if (!response.ok) throw new Error('HTTP ' + response.status);
      const bytes = await response.arrayBuffer();
      if (run !== r) return;
      r.sb.addEventListener('updateend', () => {
        r.next += 1;
        r.busy = false;
        video.dataset.segments = String(r.next);
        if (video.paused && !video.ended) video.play().catch(() => {});
        pump();
      }, {once: true});
      r.sb.appendBuffer(bytes);
    } catch (e) {
      r.busy = false;
      setTimeout(pump, 1000);
    }
  } else if (d.ended && r.ms.readyState === 'open' && !r.sb.updating) {
    r.ms.endOfStream();
  }
}
function update() {
  const d = data();
  if (!d.job || !(d.segments || []).length) {
    if (!d.job && run) { run = null; video.removeAttribute('src'); video.load(); }
    box.style.display = 'none';
    return;
  }
  box.style.display = '';
  if (!run || run.job !== d.job) start(d); else pump();
}
watch('value', update);
update();
"""


def live_player(gr):
    """The live player component (its value: `JobPanel.live`)."""
    return gr.HTML(value="{}", html_template="", js_on_load=PLAYER_JS, elem_id="live-player", padding=False)
