"""What a person reads: result tables (tables), decision pictures (pictures), report.png
(sheet), report.html (webpage, with its assets), and the files an evaluation or predict
writes (files)."""
