"""m3edge.quantize"""
