"""Benchmarks of a source checkout, beside the tests and outside the installed package: the ReFL step
(`python -m benchmarks.refl`), its memory model (`python -m benchmarks.memory_model`) and the critic
(`python -m benchmarks.reward`). Each reads a typed config with `--config FILE` / `--set key=value`, prints
one JSON object and writes it to `output_file` when set. README.md lists the results kept here."""
