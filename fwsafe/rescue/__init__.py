"""The offline rescue tool (standard library only, shipped as a zipapp).
"""
