from optstate.cli import main

raise SystemExit(main())
