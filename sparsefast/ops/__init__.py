"""Functional ops with backend dispatch (torch | triton | cuda). Each op `<name>` has its torch twin `<name>_ref`."""
