"""The final report: readers of the evaluation and training outputs (`readers`), the paired
model-vs-model tests from the per-sample predictions (`comparisons`), the results tables
(`tables`), the prose that reads them (`prose`), the plots (`plots`), and the README's generated
results section (`readme`). The report reads what evaluation produced; nothing outside it
imports it."""
