"""m3edge.export"""
