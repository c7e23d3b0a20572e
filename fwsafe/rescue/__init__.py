"""The offline rescue tool and its zipapp (standard library only: fwsafe.rescue.tool imports
fwsafe.ondisk and fwsafe.errors, nothing else).
"""
