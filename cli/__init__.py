"""m3edge.cli"""
