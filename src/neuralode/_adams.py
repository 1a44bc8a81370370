"""stub"""
SPECS = []
