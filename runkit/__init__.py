"""What every run of every package shares: typed configs (`config`), atomic files and content hashes
(`files`), logging and metrics (`logs`), resumable checkpoints (`checkpoints`) and LR schedules
(`schedules`). It imports nothing of the project's other packages."""
