"""`make bench`: every speed goal measured against raw baselines in the same run.

Run with `.venv/bin/python -m bench` (quick mode) or `BENCH_FULL=1` for the 10M-event runs;
`python -m bench --markdown-from bench/results/latest.json` prints the README's table.
"""
