"""The run's evaluation report: PNG plots (plots.py) and the self-contained HTML page
with its CSV and JSON data (html.py, laid out by template.html)."""
