"""Best-of-N selection against ReFL fine-tuning, judged by evaluators other than the selector.

- `config.py`   CompareConfig: every setting of a comparison run;
- `layout.py`   where a run's files live (samples/, scores/), shared by the writer and the readers;
- `harness.py`  draws the samples (one stock pipeline, LoRA switched in place), caches and scores them,
                and runs the whole comparison (`run_compare`);
- `stats.py`    the numbers of results.json from per-image scores (best-of-n, intervals, win rates);
- `report.py`   report.html with its plots and image grids;
- `cli.py`      the command line (`social-refl-compare`).

It sits above refl/ (it samples with refl.sampling) and below toyworld/ (the demo runs it); the
evaluators it scores with come from reward.evaluators.
"""
