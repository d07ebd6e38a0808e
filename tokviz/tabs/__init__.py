"""The app's tabs, one module each: ``build(...)`` makes the components, ``wire(...)`` connects their events.

Tabs that show one run at one traced step (inspect, concentration, layers, tokens, training) also offer
``render(run_id, step, *inputs) -> (values for outputs, focus)``, which the app calls when the run or step in
the header changes, when the tab is opened, and on a deep link. ``focus`` updates the deep link (sample,
token) and may carry a ``notice``: a line the header shows about what the tab could not show.
"""
