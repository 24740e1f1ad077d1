"""``python -m calib.site``: render the executed notebooks into the static HTML site."""

from calib.site import main

raise SystemExit(main())
