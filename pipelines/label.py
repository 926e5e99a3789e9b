"""The labeling job moved to `pipelines.corpus.job`; these names stay importable from here for
`pipelines/nightly.py` (to import them from there when it is next edited)."""

from .corpus.job import (JobFailed, check_checkpoint, error_problems, plan_label_job, required_columns,  # noqa: F401
                         run_label_job)
