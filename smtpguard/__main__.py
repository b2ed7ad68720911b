from smtpguard.cli import main

raise SystemExit(main())
