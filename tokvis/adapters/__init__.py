"""Import decisions made elsewhere, and export traces and result tables.

* :func:`read_study_json` / :func:`write_study_json` -- the "Which Tokens to Use?" study's JSON
  exports (per image, per stage ``Kept_Token`` and ``Assignment_Maps``);
* :func:`from_tome_source` -- ToMe-style source matrices ``[B, tokens, patches]``;
* :func:`to_parquet` / :func:`to_csv` / :func:`read_table` / :func:`read_trace` -- long-form tables.

torch is imported only when a trace is built.
"""

from tokvis.adapters.study_json import read_study_json, write_study_json
from tokvis.adapters.tables import read_table, read_trace, to_csv, to_parquet, trace_table
from tokvis.adapters.tome_source import from_tome_source

__all__ = [
    "from_tome_source",
    "read_study_json",
    "read_table",
    "read_trace",
    "to_csv",
    "to_parquet",
    "trace_table",
    "write_study_json",
]
