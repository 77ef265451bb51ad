from ichdlib.cli import main

raise SystemExit(main())
