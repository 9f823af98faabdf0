@echo off
rem Start DreamLayer's backend on Windows: ComfyUI (when COMFYUI_DIR is set and none answers),
rem dream_layer.py (:5002) and img2img_server.py (:5004). Ctrl-C stops everything it started.
rem
rem   start_dream_layer.bat               use the ComfyUI at COMFY_API_URL (several: comma-separated, one per GPU; or start COMFYUI_DIR's)
rem   start_dream_layer.bat --demo        use the project's fake ComfyUI (no GPU, no model)
rem   start_dream_layer.bat --no-install  do not run pip (same as DREAMLAYER_SKIP_INSTALL=1)
rem
rem Like start_dream_layer.sh, this prepares the virtualenv and then runs start_dream_layer.py,
rem which starts, watches and stops the processes. Variables: docs\configuration.md.
setlocal EnableExtensions

set "ROOT=%~dp0"
if "%ROOT:~-1%"=="\" set "ROOT=%ROOT:~0,-1%"
if not defined DREAMLAYER_VENV set "DREAMLAYER_VENV=%ROOT%\.venv"
rem relative to where it is run (the script changes folder)
for %%I in ("%DREAMLAYER_VENV%") do set "DREAMLAYER_VENV=%%~fI"
if not defined DREAMLAYER_SKIP_INSTALL set "DREAMLAYER_SKIP_INSTALL=0"
if not defined PYTHON set "PYTHON=py -3"
set "DEMO=0"

:args
if "%~1"=="" goto args_done
if /i "%~1"=="--demo" (
    set "DEMO=1"
) else if /i "%~1"=="--no-install" (
    set "DREAMLAYER_SKIP_INSTALL=1"
) else if /i "%~1"=="--help" (
    findstr /b "rem" "%~f0"
    exit /b 0
) else (
    echo start_dream_layer.bat: unknown option %~1 ^(try --help^) 1>&2
    exit /b 2
)
shift
goto args

:args_done
rem 1. The virtualenv: reuse it when it exists, create it otherwise.
set "PY=%DREAMLAYER_VENV%\Scripts\python.exe"
if exist "%PY%" goto venv_ready
%PYTHON% -c "import sys; sys.exit(sys.version_info < (3, 10))" >nul 2>&1
if errorlevel 1 (
    echo ERROR: Python 3.10 or newer not found as "%PYTHON%". Install it from python.org, or set PYTHON=C:\path\to\python.exe 1>&2
    exit /b 1
)
echo Creating the virtualenv %DREAMLAYER_VENV%
%PYTHON% -m venv "%DREAMLAYER_VENV%"
if errorlevel 1 (
    echo ERROR: could not create %DREAMLAYER_VENV% 1>&2
    exit /b 1
)

:venv_ready
rem 2. Requirements (the demo's fake ComfyUI also needs requirements-demo.txt).
if "%DREAMLAYER_SKIP_INSTALL%"=="1" goto run
set "REQS=%ROOT%\requirements.txt"
if "%DEMO%"=="1" set "REQS=%ROOT%\requirements-demo.txt"
echo Installing requirements from %REQS%
"%PY%" -m pip install -q --disable-pip-version-check -r "%REQS%"
if errorlevel 1 (
    echo ERROR: pip install -r "%REQS%" failed; see the messages above 1>&2
    exit /b 1
)

:run
rem 3. Start, watch and stop the processes (see start_dream_layer.py).
cd /d "%ROOT%"
"%PY%" "%ROOT%\start_dream_layer.py" %*
exit /b %errorlevel%
