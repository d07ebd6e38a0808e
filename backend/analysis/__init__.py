"""Analyses of indexed runs: the registry of analyses with their figures (``registry``), the trace analyses
(``trace``), metrics with textbook definitions (``metrics``), pure figure builders (``figures``) and the
``analyze`` / ``compare`` reports (``report``).
"""
