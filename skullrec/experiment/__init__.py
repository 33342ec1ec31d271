"""The method/lambda/seed sweep and its tables and figures."""
