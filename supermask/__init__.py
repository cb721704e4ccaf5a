"""The ``supermask`` command line (train, evaluate, inspect, serve): the top of the import graph.

It imports :mod:`service` and :mod:`training`; neither imports it.
"""
