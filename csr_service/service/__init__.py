"""The process: wiring one worker's service from the Config (``wiring``, ``components``),
running workers under a supervisor (``supervisor``), readiness (``health``) and dev-mode state
(``dev``)."""
