"""The character-training recipe (Open Character Training): its stages (stages/, one module
per concept, listed in registry.py) and their libraries: quality filters, gate checks,
trainers, tiny models, eval statistics, the report, estimates, and the services the stages
get from the command line (services.py)."""
