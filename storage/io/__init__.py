"""Files in and out of the store.

In: one reader per format turns a file into plain rows (`prompts.read_prompt_file`, `preferences.read_hh` /
`read_trl`, `rated.read_rated_file`), all over `records` (the one JSONL/Parquet record reader); `bulk` writes
rows in one verified transaction; `imports` joins the two (`import_prompts`, `import_preferences`,
`import_rated`). Out: `storage.io.export` (TRL / KTO / SFT / raw tables as Parquet, JSONL or CSV).
Nothing here imports `storage.store`: the functions take the store as their first argument.
"""

from .imports import import_preferences, import_prompts, import_rated
from .records import FileFormatError

__all__ = ["import_prompts", "import_preferences", "import_rated", "FileFormatError"]
