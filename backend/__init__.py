"""tokviz backend: everything that computes (models, tasks, schemes, tracer, jobs, index, analyses, CLI).

Never imports gradio. Modules the web app imports at start (queries, figures, job launching) do not import
torch; jobs that need torch run in their own processes (``python -m backend ...``).
"""
