"""The page's stylesheet, inlined and allowed by its hash in the Content-Security-Policy."""

from __future__ import annotations

import base64
import hashlib

CSS = """
:root {
  --bg: #f4f6fb; --card: #ffffff; --ink: #172033; --muted: #5e6a82; --line: #e3e8f1;
  --accent: #4f5bd5; --accent-soft: #e8eaff; --ok: #1f9d6a; --ok-soft: #e3f6ee;
  --warn: #c77700; --warn-soft: #fff3dc; --bad: #d2353f; --bad-soft: #fde8ea;
  --track: #edf0f6; --shadow: 0 1px 2px rgba(23,32,51,.06), 0 4px 16px rgba(23,32,51,.05);
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #0f1420; --card: #171e2d; --ink: #e6eaf3; --muted: #98a3b9; --line: #263049;
    --accent: #8c96ff; --accent-soft: #262d52; --ok: #3ccf92; --ok-soft: #143327;
    --warn: #f3a93c; --warn-soft: #3a2c12; --bad: #ff6b74; --bad-soft: #42191e;
    --track: #232c40; --shadow: none;
  }
}
* { box-sizing: border-box; }
body {
  margin: 0; background: var(--bg); color: var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
        "Noto Sans", "Liberation Sans", sans-serif;
}
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
       background: var(--track); padding: 1px 5px; border-radius: 4px; }
.wrap { max-width: 1120px; margin: 0 auto; padding: 0 24px; }
.top { background: var(--card); border-bottom: 1px solid var(--line); }
.top .wrap { display: flex; align-items: center; justify-content: space-between; height: 56px; }
.brand { font-weight: 700; font-size: 17px; color: var(--ink); letter-spacing: .2px;
         display: flex; align-items: center; gap: 8px; }
.brand svg { width: 22px; height: 22px; }
.who { display: flex; align-items: center; gap: 10px; color: var(--muted); font-size: 14px; }
.who b { color: var(--ink); }
.pill { display: inline-block; padding: 1px 9px; border-radius: 999px; font-size: 12px;
        font-weight: 600; letter-spacing: .2px; background: var(--accent-soft);
        color: var(--accent); }
.pill.ok { background: var(--ok-soft); color: var(--ok); }
.pill.warning { background: var(--warn-soft); color: var(--warn); }
.pill.exceeded { background: var(--bad-soft); color: var(--bad); }
button, .button {
  font: inherit; font-size: 14px; border: 1px solid var(--line); background: var(--card);
  color: var(--ink); padding: 6px 14px; border-radius: 8px; cursor: pointer;
}
button.primary { background: var(--accent); border-color: var(--accent); color: #fff;
                 font-weight: 600; padding: 9px 18px; }
form.inline { display: inline; margin: 0; }
.hero { padding: 28px 0 8px; }
h1 { margin: 0 0 4px; font-size: 26px; letter-spacing: -.3px; }
h2 { font-size: 17px; margin: 0 0 14px; letter-spacing: -.1px; }
.muted { color: var(--muted); }
.small { font-size: 13px; }
section { margin: 22px 0 30px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 16px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 12px;
        padding: 16px 18px; box-shadow: var(--shadow); }
.quota { border-left: 4px solid var(--ok); }
.quota.warning { border-left-color: var(--warn); }
.quota.exceeded { border-left-color: var(--bad); }
.quota .head { display: flex; justify-content: space-between; align-items: baseline; gap: 8px; }
.quota .name { font-weight: 650; font-size: 16px; }
.quota .what { color: var(--muted); font-size: 13px; margin: 2px 0 12px; }
.quota .numbers { display: flex; justify-content: space-between; align-items: baseline; }
.quota .used { font-size: 22px; font-weight: 650; letter-spacing: -.3px; }
.quota .used small { font-size: 14px; font-weight: 500; color: var(--muted); }
.quota .pct { font-weight: 600; color: var(--muted); }
svg.bar { width: 100%; height: 10px; display: block; margin: 8px 0 10px; }
svg.bar .track { fill: var(--track); }
svg.bar .fill { fill: var(--ok); }
.warning svg.bar .fill { fill: var(--warn); }
.exceeded svg.bar .fill { fill: var(--bad); }
svg.bar .tick { stroke: var(--card); stroke-width: 2; }
.quota .foot { font-size: 13px; color: var(--muted); }
.quota .note, .quota .grant { margin-top: 6px; font-size: 13px; }
.quota .grant { color: var(--ok); }
.quota .returns { margin-top: 6px; font-size: 13px; color: var(--bad); font-weight: 600; }
.quota.warning .returns { color: var(--warn); }
.quota .forecast { margin-top: 6px; font-size: 13px; color: var(--warn); }
.event .count { font-weight: 700; }
.event .repeat, .workload .usage { color: var(--muted); font-size: 12px; }
.total-cost { margin-left: auto; margin-right: 12px; font-weight: 600; }
.section-head { display: flex; justify-content: space-between; align-items: center; }
.tabs { display: flex; gap: 4px; background: var(--card); border: 1px solid var(--line);
        border-radius: 9px; padding: 3px; margin-bottom: 14px; }
.tabs a { padding: 3px 11px; border-radius: 6px; color: var(--muted); font-size: 13px; }
.tabs a.on { background: var(--accent-soft); color: var(--accent); font-weight: 600; }
.tabs a:hover { text-decoration: none; color: var(--ink); }
.chart-card .title { display: flex; justify-content: space-between; align-items: baseline; }
.chart-card .title b { font-size: 15px; }
.chart-card .title span { font-size: 13px; color: var(--muted); }
.chart-card .sub { font-size: 12px; color: var(--muted); margin-bottom: 6px; }
svg.chart { width: 100%; height: auto; display: block; }
svg.chart .bar { fill: var(--accent); }
svg.chart .bar:hover { opacity: .75; }
svg.chart .grid { stroke: var(--line); stroke-width: 1; }
svg.chart .grid.base { stroke: var(--muted); stroke-opacity: .5; }
svg.chart text { fill: var(--muted); font-size: 11.5px; }
.charts { grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); }
svg.chart text.empty { font-size: 13px; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
@media (max-width: 860px) { .cols { grid-template-columns: 1fr; } }
table { width: 100%; border-collapse: collapse; font-size: 14px; }
th { text-align: left; font-weight: 600; color: var(--muted); font-size: 12px;
     text-transform: uppercase; letter-spacing: .4px; padding: 0 8px 8px 0; }
td { padding: 9px 8px 9px 0; border-top: 1px solid var(--line); vertical-align: top; }
td.when { white-space: nowrap; color: var(--muted); font-size: 13px; }
.event .msg { margin-top: 3px; color: var(--ink); font-size: 13.5px; }
.event .id { color: var(--muted); font-size: 12px; margin-top: 3px; }
.empty-state { color: var(--muted); font-size: 14px; padding: 6px 0; }
footer { padding: 10px 24px 40px; font-size: 13px; }
.signin { max-width: 460px; margin: 9vh auto; padding: 28px 30px; }
input:focus, button:focus-visible { outline: 2px solid var(--accent); outline-offset: 1px; }
.signin h1 { font-size: 24px; }
.signin label { display: block; font-weight: 600; font-size: 14px; margin: 18px 0 6px; }
.signin input[type=password], .signin input[type=text] {
  width: 100%; font: 14px ui-monospace, Menlo, Consolas, monospace; padding: 10px 12px;
  border: 1px solid var(--line); border-radius: 8px; background: var(--bg); color: var(--ink);
}
.signin .actions { margin-top: 16px; display: flex; justify-content: flex-end; }
.signin .help { font-size: 13px; color: var(--muted); margin-top: 18px; }
.alert { background: var(--bad-soft); color: var(--bad); border-radius: 8px; padding: 10px 12px;
         font-size: 14px; margin-top: 14px; }
.lookup { display: flex; gap: 10px; align-items: center; }
.lookup label { font-weight: 600; font-size: 14px; }
.lookup input { flex: 1; font: inherit; padding: 8px 12px; border: 1px solid var(--line);
                border-radius: 8px; background: var(--bg); color: var(--ink); }
.subjects { columns: 3 180px; padding: 0; list-style: none; margin: 0; }
.subjects li { padding: 3px 0; }
"""

CSS_HASH = "sha256-" + base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
CSP = (
    f"default-src 'none'; style-src '{CSS_HASH}'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
