"""Ray pipelines over the `bloom` replica: the offline labeling job (Ray Data) and, later, the Serve app."""
