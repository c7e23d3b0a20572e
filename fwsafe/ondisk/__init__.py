"""On-disk formats shared by the running tool and the rescue zipapp (standard library only).
"""
