"""Engine: persistence, containers, agents and jobs."""
