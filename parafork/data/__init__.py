"""Training data: paragraph trees extracted from chat answers."""
