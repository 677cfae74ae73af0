"""Helpers of the method tests: subprocess scripts and the tiny shared training runs."""
