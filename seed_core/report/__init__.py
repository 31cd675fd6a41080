"""The final report: readers of the evaluation and training outputs (`readers`), the results
tables (`tables`), the prose that reads them (`prose`) and the plots (`plots`). The report reads
what evaluation produced; nothing outside it imports it."""
