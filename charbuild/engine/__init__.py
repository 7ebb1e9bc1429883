"""The engine: build graph, action keys, staleness, plans and the scheduler.

It knows targets, keys and the stage contract (charbuild.contract), never a recipe:
no stage, backend, call cache or target name is imported or named here.
"""
