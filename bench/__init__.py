"""`make bench`: each module measures one component side by side with a baseline in the same run."""
