"""The paper's metrics and figures, what an upload leaks (attacks), and the typed run results."""
