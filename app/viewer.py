"""``streamlit run app/viewer.py``: the skullrec viewer from a source checkout.

The page itself is the package's ``skullrec/viewer/page.py`` (what ``skullrec view`` runs, also from an
installed wheel); this entry runs it as Streamlit runs a script, on every rerun.
"""

import runpy

from skullrec.viewer.launch import page_path

runpy.run_path(str(page_path()), run_name="__main__")
