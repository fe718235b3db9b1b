"""The search: space (plans from trials), sensitivity ranking, objective, study handling."""
