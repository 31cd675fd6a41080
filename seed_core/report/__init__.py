"""The final report: readers of the evaluation and training outputs (`readers`), the paired
model-vs-model tests from the per-sample predictions (`comparisons`), the results tables
(`tables`), the prose that reads them (`prose`), the plots (`plots`), where a run's wall time
goes (`timing`), the README's generated results section (`readme`) and the settings-search
table (`experiments`). The report reads what evaluation produced; nothing outside it
imports it."""
