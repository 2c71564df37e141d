"""The webui glue: the only sub-package that imports ``modules.*`` (A1111 1.10.1 and its forks).

Imports of ``modules`` happen inside functions, after the webui has loaded, so importing
``lib_vaebatch.webui.args`` stays possible without a webui (API docs, tests, standalone tools).
"""
