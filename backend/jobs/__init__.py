"""Jobs: the registry of job kinds (``registry``), one module per kind with its config dataclass (``train``,
...), the config machinery shared by the CLI, YAML files and the web form (``config``), and the queue that
runs jobs as processes (``queue``). Nothing here imports torch: the web app imports it at start.
"""
